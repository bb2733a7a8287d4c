"""Text given to a language model (``sample --prime``, ``predict --text``, ``plot-boundaries
--text``), read the way the model's training data read its own files.

A checkpoint written while training keeps the datamodule's class and its ``text_options()``
(``HMRNNLanguageModel.text_reading``); the class's ``text_to_symbols`` turns text into symbols
(PTB's character files: ``t h e _ c a t``). Checkpoints without it (older ones, or data that is
not a character-stream datamodule) read each character as one symbol.
"""

from __future__ import annotations

from typing import Callable

from hmrnn_lightning.commands.runs import fail


def corpus_reader(model) -> tuple[Callable[[str], list[str]], str | None]:
    """``(text -> symbols, how to write text)`` for ``model``; the description is None when the
    checkpoint does not say how its data was read."""
    from hmrnn_lightning.registry import RegistryError, import_path

    reading = getattr(model, "text_reading", None)
    if isinstance(reading, dict) and isinstance(reading.get("datamodule"), str):
        try:
            cls = import_path(reading["datamodule"])
        except RegistryError:  # a plugin's datamodule no longer installed: read characters
            cls = None
        options = reading.get("options") if isinstance(reading.get("options"), dict) else {}
        if cls is not None and callable(getattr(cls, "text_to_symbols", None)):
            return (lambda text: list(cls.text_to_symbols(text, **options))), cls.text_format(**options)
    return list, None


def reads_without_separators(model) -> bool:
    """Whether ``model``'s checkpoint says its text was read with ``remove_separators``."""
    reading = getattr(model, "text_reading", None)
    return isinstance(reading, dict) and bool((reading.get("options") or {}).get("remove_separators"))


def model_symbols(model, text: str, where: str) -> list[str]:
    """The symbols of ``text`` as ``model`` reads them; symbols it does not know are one line
    naming ``where`` the text came from and how the model wants text written."""
    to_symbols, how = corpus_reader(model)
    symbols = to_symbols(text)
    known = set(model.vocab)
    unknown = sorted({s for s in symbols if s not in known})
    if unknown:
        shown = ", ".join(repr(s) for s in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        if how:
            hint = f"; this model was trained on {how}"
        elif " " in unknown and "_" in known:
            hint = "; this model writes a space between words as `_`"
        else:
            hint = ""
        fail(f"{where} holds {len(unknown)} symbol{'s' if len(unknown) > 1 else ''} the model does not know: {shown}{hint}")
    return symbols
