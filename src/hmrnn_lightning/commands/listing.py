"""``hmrnn list``: the registered components, plugins included."""

from __future__ import annotations

from hmrnn_lightning import registry


def cmd_list(argv: list[str]) -> int:
    """hmrnn list [KIND]: the registered components, plugins included."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: hmrnn list [KIND]\n\nLists short names and class paths of components; kinds: " + ", ".join(registry.KINDS))
        return 0
    kinds = argv or list(registry.KINDS)
    for kind in kinds:
        if kind not in registry.KINDS:
            raise registry.RegistryError(f"unknown kind {kind!r}; kinds are {', '.join(registry.KINDS)}")
        plugins = registry.plugin_entry_points(kind)
        print(f"{kind}:")
        for name, path in registry.available(kind).items():
            tag = "  (plugin)" if name in plugins and name not in registry.BUILTIN[kind] else ""
            print(f"  {name:<12} {path}{tag}")
    return 0
