"""AbC (SPEC §4): attribution evaluated on customized models. Import submodules explicitly."""
