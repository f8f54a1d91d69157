from .perplexity import perplexity
from .sparsity import measure_sparsity, sparsity_of_saved

__all__ = ["perplexity", "measure_sparsity", "sparsity_of_saved"]
