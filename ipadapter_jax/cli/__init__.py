"""The command-line tool: one module per subcommand."""
