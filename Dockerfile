# DefectPrune dashboard, CPU only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DEFECTPRUNE_WORKSPACE=/workspace \
    DEFECTPRUNE_DATA_ROOTS=/data:/workspace/datasets

WORKDIR /app
COPY requirements.txt .
# CPU wheels of torch first; requirements.txt's torch==2.14.1 is then already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install -r requirements.txt

COPY . .
RUN useradd --create-home --uid 1000 app \
 && mkdir -p /workspace /data \
 && chown -R app:app /workspace /app
USER app
VOLUME ["/workspace"]

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://localhost:8501/_stcore/health', timeout=4)"
# ui.serve: streamlit run app.py with the engine imported before the server listens
CMD ["python", "-m", "ui.serve", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
