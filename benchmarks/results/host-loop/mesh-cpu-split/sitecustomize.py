# Profile one mesh process with cProfile: PYTHONPATH=<this dir> PROF_MATCH=<text in its command line> CMD (dumps $PROF_OUT/prof-PID.out at exit, /tmp by default)
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
            _p.dump_stats(os.path.join(os.environ.get("PROF_OUT", "/tmp"), f"prof-{os.getpid()}.out"))
        atexit.register(_dump)
