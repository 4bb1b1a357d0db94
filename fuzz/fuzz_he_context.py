"""atheris target: he_context (see fuzz/README.md). Run: python fuzz/fuzz_he_context.py -max_total_time=600"""
from _harness import main

if __name__ == "__main__":
    main("he_context")
