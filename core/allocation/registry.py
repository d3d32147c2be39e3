"""Every allocator by name. The command line's choices, the job validation, the method table
and the dashboard's labels read `ALLOCATORS`; a new allocator is a module with its `Allocator`
and one line here. The order is the dashboard's (uniform, the default, first)."""

from __future__ import annotations

from core.allocation.baselines import GlobalAllocator, SensitivityAllocator, UniformAllocator
from core.allocation.context import Allocator
from core.allocation.scoring_network import ScoringNetworkAllocator

ALLOCATORS: dict[str, Allocator] = {
    "uniform": UniformAllocator(),
    "global": GlobalAllocator(),
    "scoring-network": ScoringNetworkAllocator(),
    "sensitivity": SensitivityAllocator(),
}
