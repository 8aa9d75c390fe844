"""Preset data shipped with the package: ``presets.toml``, read by ``SwitchConfig.preset`` (docs/T5X_SWITCH.md §3)."""
