# Profile one mesh process with cProfile: PYTHONPATH=<this dir> PROF_MATCH=<text in its command line> CMD (dumps /tmp/s7/prof-PID.out at exit)
import os
_match = os.environ.get("PROF_MATCH")
if _match:
    cl = open("/proc/self/cmdline", "rb").read().replace(b"\0", b" ").decode()
    if _match in cl:
        import cProfile, atexit, signal
        _p = cProfile.Profile()
        _p.enable()
        def _dump():
            _p.disable()
            _p.dump_stats(f"/tmp/s7/prof-{os.getpid()}.out")
        atexit.register(_dump)
