"""Start the agent so that it dies with the controller that started it (:class:`host.fleet.transport.LocalTransport`).

Sent as text, never installed: the local transport runs ``<this interpreter> -S -c <this file's text> PARENT_PID
AGENT_ARGV...``; the program then becomes the agent (``os.execvp``: the device config's ``python -m agent run
...``). It does its work only under ``__main__``: the host imports it for :data:`LAUNCH_FAILED` alone.

Why: the agent runs in its own session (a deadline kills its whole process group), so when a controller was
SIGKILLed its agent used to go on measuring -- beside the next controller's, once the dead one's lease expired.
Linux's ``PR_SET_PDEATHSIG`` (kept across ``execv``) SIGKILLs it when the thread that started it ends, and that
thread waits for it. A parent already gone before the signal was armed is caught by comparing ``getppid()``.

Exit status :data:`LAUNCH_FAILED` (a shell's too) with ``cannot start the agent with ...`` on stderr when the
agent's program cannot be started; otherwise the agent's own.
"""
import ctypes
import os
import signal
import sys

LAUNCH_FAILED = 127
PR_SET_PDEATHSIG = 1


def main():
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass
    if os.getppid() != int(sys.argv[1]):
        sys.exit("edgeprune: the controller that started this agent is gone")
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        sys.stderr.write("cannot start the agent with %s: %s" % (sys.argv[2], e))
        sys.exit(LAUNCH_FAILED)


if __name__ == "__main__":
    main()
