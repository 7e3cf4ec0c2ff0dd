"""fnserve's services. The version is kept here, not read from the installed package's metadata: the
Bento and its container copy the sources and install no `fnserve` distribution (pyproject.toml reads
it from here)."""

__version__ = "0.1.0"
