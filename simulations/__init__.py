"""Entry points that run federations: the in-process loop and the `fedmeta` command line."""
