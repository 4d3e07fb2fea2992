FROM python:3.11-slim
WORKDIR /app
# .dockerignore keeps .env, .git, tests and local state out of the context.
COPY . /src
# Installed from the source as a wheel would be (not editable): the image
# holds the package, not the checkout, at the versions in constraints.txt.
RUN pip install --no-cache-dir -c /src/constraints.txt /src \
    && rm -rf /src \
    && useradd --create-home recovery \
    && mkdir var && chown recovery var
USER recovery
