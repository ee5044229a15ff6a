"""The in-process Engine: scheduler + KV cache manager + model runner in one process."""
