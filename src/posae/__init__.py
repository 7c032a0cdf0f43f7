"""posae: position-aware sparse autoencoders on language-model activations.

Shape suffixes in names where tensors meet (as in dictionary_learning):

    B  batch of tokens           D  model width d (residual stream)
    K  dictionary size k         G  global-group size (k/2)
    P  position-group size (k/2) T  context length (sequence positions)
    N  tokens in a store         S  sequences
    H  attention heads           E  head width

e.g. ``x_BD`` activations, ``pos_B`` positions, ``f_BK`` features, ``W_dec_KD`` decoder.
"""

import warnings

# Libraries we import (huggingface_hub, datasets) use `tqdm.auto`, which in a Jupyter kernel without
# ipywidgets warns once and falls back to the text bar. The text bar is what we want there (see
# `posae.progress`), so the warning says nothing to a reader of a rendered notebook.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

__version__ = "0.1.0"
