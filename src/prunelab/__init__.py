"""prunelab: prune large language models, recover them with local reconstruction, report honestly."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prunelab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# after the subpackage `prunelab.prune` is imported, so that the name means the function
from .api import perplexity, prune, run  # noqa: E402
from .config import RunConfig, SparseGPTConfig  # noqa: E402
from .errors import PrunelabError  # noqa: E402

__all__ = ["PrunelabError", "RunConfig", "SparseGPTConfig", "perplexity", "prune", "run"]
