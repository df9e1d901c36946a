# Data only: the TOML packs of role templates (assessor, augmentor) shipped with sdrt.
