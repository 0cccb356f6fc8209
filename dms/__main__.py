from dms.cli.app import run

run()
