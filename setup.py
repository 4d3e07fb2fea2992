"""The build's one step pyproject.toml cannot say: the migrations, the
templates and the beat schedule live at the top of the repository, where
operators look for them, and the wheel carries them inside the package
(recovery/_shipped/), where recovery/paths.py finds them when installed."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("migrations", "templates", "celerybeat-schedule.py")


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them where they are
        target = Path(self.build_lib) / "recovery" / "_shipped"
        for name in SHIPPED:
            source = Path(name)
            if source.is_dir():
                shutil.copytree(
                    source,
                    target / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True,
                )
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildWithShippedFiles})
