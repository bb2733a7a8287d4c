"""Where hmrnn-lightning changes another library's behaviour; each patch says why and which version.

- :func:`install_short_names`: jsonargparse (4.x, tested with 4.53) resolves class names only;
  registered short names (``step``, ``ptb``, plugin names) are added.
- :func:`quiet_library_warnings`: warnings of Lightning (2.6) and torch (2.13) that a user of
  ``hmrnn`` can do nothing about.
"""

from __future__ import annotations

import logging
import warnings

from hmrnn_lightning import registry


def install_short_names() -> None:
    """Let jsonargparse resolve registered short names wherever it resolves a class name.

    jsonargparse resolves a bare name by matching the class names of imported subclasses of the
    expected type, and has no hook for other aliases; its one resolver is wrapped (once) so a
    registered name (``step``, ``ptb``, a plugin's entry-point name) is tried first. Config files
    (``-c``/``--config``), command-line values and nested ``init_args`` all go through it, and the
    parsed (and saved) config holds the full class path.
    """
    from jsonargparse import _typehints

    original = _typehints.resolve_class_path_by_name
    if getattr(original, "_hmrnn_short_names", False):
        return

    def resolve_class_path_by_name(cls, name: str) -> str:
        if not isinstance(name, str) or "." in name:
            return original(cls, name)
        path = registry.class_path_for(cls, name)
        if path is None:
            path = original(cls, name)
        if "." not in path:
            # one of our kinds: its short names; else (models) the class names jsonargparse could resolve
            known = registry.names_for(cls) or _imported_subclass_names(cls)
            if known:
                raise registry.RegistryError(f"unknown name {name!r}; known: {', '.join(known)}; or give a full class path")
        return path

    resolve_class_path_by_name._hmrnn_short_names = True  # type: ignore[attr-defined]
    _typehints.resolve_class_path_by_name = resolve_class_path_by_name


def _imported_subclass_names(cls) -> list[str]:
    """Names of the imported, concrete subclasses of ``cls`` (a class, or a tuple of them) that
    live in a package (not ``__main__`` or a test module), as jsonargparse matches bare names."""
    import inspect

    seen, stack = set(), list(cls if isinstance(cls, tuple) else (cls,))
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    return sorted({c.__name__ for c in seen if not inspect.isabstract(c) and not c.__name__.startswith("_")
                   and c.__module__.split(".")[0] not in ("__main__", "tests", "lightning", "pytorch_lightning")})


def quiet_library_warnings(evaluating: bool = False, resuming: bool = False) -> None:
    """Silence library warnings a user of ``hmrnn`` can do nothing about; the only place that does.

    - LightningCLI warns when ``args`` is given while ``sys.argv`` is non-empty: ``hmrnn`` passes its
      own ``sys.argv[1:]`` on purpose (so the small commands and tests share one entry point).
    - Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates (``isinstance(treespec,
      LeafSpec)``); the call is inside Lightning, so only a Lightning release can fix it.
    - Lightning logs a tip to install a logging service on every run whatever logger is chosen
      (an INFO record, not a warning): dropped from Lightning's own log handlers.
    - ``evaluating`` (``validate``/``test``/``predict``): Lightning warns that the checkpoint's
      callbacks (checkpointing, slope annealing...) are missing; they act during training only.
    - ``resuming`` (``fit --resume RUN``): Lightning warns that the checkpoint folder is not
      empty; a resumed run writes into its own folder on purpose.

    Our own causes are fixed instead: the logger is chosen explicitly (no tensorboardX notice, no
    logging-service tip), and checkpoint/early-stopping monitors wait for validation.
    """
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    if evaluating:
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
    if resuming:
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())


class _DropTips:
    """A logging filter: drops Lightning's advertising tips, keeps everything else."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("\U0001f4a1 Tip:")
