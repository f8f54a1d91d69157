"""prunelab: prune large language models, recover them with local reconstruction, report honestly."""

from .api import prune, run
from .config import RunConfig, SparseGPTConfig
from .errors import PrunelabError
from .evaluate.perplexity import perplexity

__all__ = ["PrunelabError", "RunConfig", "SparseGPTConfig", "perplexity", "prune", "run"]
__version__ = "0.1.0"
