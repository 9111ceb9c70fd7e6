"""One module per ``apt`` subcommand; each defines ``add_parser(subparsers)``."""
