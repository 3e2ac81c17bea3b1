"""One module per `cytologia` subcommand (see :mod:`cytologia.cli`)."""
