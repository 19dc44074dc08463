from mixcompile.cli import entry_point

entry_point()
