"""Command implementations behind ``strato-peft`` subcommands."""
