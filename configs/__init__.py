"""ml_collections experiment configs, one file per family: get_config("variant")."""
