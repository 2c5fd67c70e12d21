"""Settings files read one way for every stage: a dataclass schema's defaults, then YAML layers, then `key=value`
overrides, typed and checked by OmegaConf; errors name the file and the key."""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


def merge_settings(schema: Any, layers: list, overrides: list[str] | tuple, where: str,
                   error: type[Exception] = ValueError, hint: str = "") -> Any:
    """The schema (a dataclass or an instance) with each layer (a DictConfig or dict) merged over it in order,
    then the overrides, one by one, so that a key may index a list (`streams.0.k=8`); the typed dataclass
    (OmegaConf.to_object). Raises `error` naming `where`, the key and `hint` (what the keys are, or an example)."""
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise error(f"overrides {list(bad)}: write them as key=value{hint}")
    try:
        merged = OmegaConf.structured(schema)
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        if overrides:  # set on a plain copy (frozen dataclasses' nodes are read-only), checked by the merge back
            plain = OmegaConf.create(OmegaConf.to_container(merged))
            for item in overrides:
                key, _, raw = item.partition("=")
                OmegaConf.update(plain, key, OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"])
            merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise error(f"{where}: no value for {', '.join(missing)}; set it in the file or as key=value{hint}")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as failure:
        key = getattr(failure, "full_key", None)
        given = f" (overrides {list(overrides)})" if overrides else ""
        raise error(f"{where}{given}: key {key!r}: {str(failure).splitlines()[0]}{hint}") from None
