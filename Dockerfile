FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -e . && useradd --create-home recovery && mkdir var && chown recovery var
USER recovery
