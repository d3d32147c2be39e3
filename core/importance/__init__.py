"""Filter scoring (METHOD.md part 1): contribution, substitutability, the combined score and
collaborative removal, each a Torch-Pruning `Importance` so that one pruner runs every
criterion; `criteria.CRITERIA` names them all."""
