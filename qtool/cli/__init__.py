"""qtool's command line: Typer commands that parse, call the API and print."""
