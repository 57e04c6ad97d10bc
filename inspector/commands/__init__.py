"""One module per `inspector` subcommand, each exposing `add_arguments(parser)` and `run(args) -> int`.

Command-line parsing lives here, on top of the library packages (tdad, engines, calibration), which never import
the daemon or its config; `inspector.cli` imports only the module of the chosen subcommand.
"""
