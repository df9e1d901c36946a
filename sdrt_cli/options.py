"""Option values given as text: ``KEY=VALUE`` pairs (``--dataset-option``, a pool's options) and
``STAGE.OPTION=VALUE`` stage overrides (``--set`` of ablate and calibrate), with their values
converted to bool, int or float where they read as one."""

from __future__ import annotations

from typing import Any

from sdrt_cli.errors import SdrtError


def parse_key_values(pairs: list[str] | str | None, flag: str = "--dataset-option") -> dict[str, Any]:
    """``["size=10", "facts_in_text=true"]`` -> {"size": 10, "facts_in_text": True}."""
    if not pairs:
        return {}
    if isinstance(pairs, str):
        pairs = [p for p in pairs.split(",") if p]
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SdrtError(f"{flag} {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = _coerce(value.strip())
    return out


def _coerce(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_sets(pairs: list[str], params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``["traces.limit=8"]`` -> {"traces": {"limit": 8}}; ``params`` are the options each stage
    accepts (``sdrt_cli.stages.stage_option_params``), so an unknown stage or option is refused."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise SdrtError(f"--set {pair!r} is not STAGE.OPTION=VALUE (e.g. traces.limit=8)")
        key, value = pair.split("=", 1)
        stage, option = key.split(".", 1)
        option = option.replace("-", "_")
        if stage not in params:
            raise SdrtError(f"--set {pair!r}: {stage!r} is not a stage; stages are {', '.join(params)}")
        if option not in params[stage]:
            raise SdrtError(f"--set {pair!r}: `sdrt {stage}` has no option {option!r}")
        out.setdefault(stage, {})[option] = parse_key_values([f"v={value}"], "--set")["v"]
    return out
