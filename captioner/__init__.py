"""captioner: image captioning with a pretrained CNN encoder and a recurrent decoder."""

from captioner.api import Caption, Captioner, Captions
from captioner.decoding import DecodingOptions
from captioner.tags import Tag

__all__ = ["Caption", "Captioner", "Captions", "DecodingOptions", "Tag"]
__version__ = "0.1.0"
