"""Makes `lm_eval --model gpt2lab` work on lm-eval releases that do not read the "lm_eval.models" entry
points yet (0.4.13 and before): run at Python start-up by `gpt2lab_lm_eval.pth`, it waits for
lm-eval's model registry to be imported and then adds the entry points of that group to it.

Nothing is imported at start-up but this module (no lm_eval, no torch): a finder on sys.meta_path
notices the import of `lm_eval.api.registry` and, once that module has run, registers each
"lm_eval.models" entry point as a lazy placeholder (its module is imported only when `--model` names
it). lm-eval's built-in backends are registered first, as its registry would on its own (it fills
itself only while empty). A release that discovers entry points itself (it has `import_plugins`)
is left alone.
"""

from __future__ import annotations

import sys
from types import ModuleType

TYPE_CHECKING = False  # as in gpt2lab/__init__: nothing but sys and types at start-up
if TYPE_CHECKING:
    import importlib.machinery

REGISTRY_MODULE = "lm_eval.api.registry"
GROUP = "lm_eval.models"


def register_entry_points(registry: ModuleType) -> None:
    """Add the "lm_eval.models" entry points not yet registered to lm-eval's model registry."""
    from importlib.metadata import entry_points

    if hasattr(registry, "import_plugins"):  # this lm-eval reads the entry points itself
        return
    import lm_eval.models  # noqa: F401  (the built-in backends, before the registry is non-empty)

    for entry in entry_points(group=GROUP):
        if entry.name not in registry.model_registry:
            registry.model_registry.register(entry.name, target=entry.value.replace(" ", ""))


class _RegistryHook:
    """A sys.meta_path finder (the protocol needs only `find_spec`) that finds nothing itself; it wraps
    the loader of lm-eval's registry module to run `register_entry_points` after it."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != REGISTRY_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            try:
                register_entry_points(module)
            except Exception as e:  # a broken plugin must not break lm-eval's own backends
                print(f"gpt2lab: lm_eval.models entry points not registered: {e}", file=sys.stderr)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Put the hook on sys.meta_path (what the .pth file runs); nothing when lm-eval's registry is already imported."""
    if REGISTRY_MODULE in sys.modules:
        register_entry_points(sys.modules[REGISTRY_MODULE])
    elif not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())
