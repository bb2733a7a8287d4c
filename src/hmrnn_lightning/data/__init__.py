"""Character-stream datamodules: contiguous streams for stateful truncated BPTT."""

from hmrnn_lightning.data.base import CharStreamDataModule, DataError
from hmrnn_lightning.data.iam import IAMOnDBDataModule
from hmrnn_lightning.data.ptb import PTBDataModule
from hmrnn_lightning.data.streams import StreamWindows, batchify
from hmrnn_lightning.data.synthetic import SyntheticDataModule, generate_corpus
from hmrnn_lightning.data.text import Enwik8DataModule, Text8DataModule, TextDataModule
from hmrnn_lightning.data.vocab import Vocabulary

__all__ = [
    "CharStreamDataModule", "DataError", "IAMOnDBDataModule", "Enwik8DataModule", "PTBDataModule", "StreamWindows", "SyntheticDataModule",
    "Text8DataModule", "TextDataModule", "Vocabulary", "batchify", "generate_corpus",
]
