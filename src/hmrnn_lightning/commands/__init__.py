"""The small commands of ``hmrnn`` beside LightningCLI's subcommands, one module each.

Each ``cmd_*`` takes the arguments after its name and returns an exit code.
"""
