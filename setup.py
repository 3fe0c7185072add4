"""Builds the optional Cython hot paths; the package stays importable (pure Python) when they fail."""

import os

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A failed native build must not fail the install: every native module has a pure twin."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            print(f"umcef: native extensions not built ({exc}); using pure Python")

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"umcef: {ext.name} not built ({exc}); using pure Python")


def native_extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("UMCEF_NO_NATIVE") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    import glob

    sources = sorted(glob.glob("_native/*.pyx"))
    from setuptools import Extension

    exts = [Extension("umcef._native." + os.path.basename(s)[:-4], [s]) for s in sources]
    return cythonize(exts, compiler_directives={"language_level": "3"}, quiet=True)


def namespaced_packages() -> list[str]:
    """Every package under the top-level folders, named inside the `umcef` namespace."""
    found = []
    for top in ("fabric", "adapters", "router", "_native"):
        for dirpath, _dirs, files in os.walk(top):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                found.append("umcef." + dirpath.replace(os.sep, "."))
    return sorted(found)


setup(
    packages=namespaced_packages(),
    ext_modules=native_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
