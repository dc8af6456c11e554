import signal
import sys

from .cli import main

code = main()
for sig in (signal.SIGTERM, signal.SIGINT):   # exiting with the command's status: a late signal must not
    signal.signal(sig, signal.SIG_IGN)        # turn it into a traceback or a death by that signal
sys.exit(code)
