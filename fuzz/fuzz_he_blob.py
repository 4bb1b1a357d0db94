"""atheris target: he_blob (see fuzz/README.md). Run: python fuzz/fuzz_he_blob.py -max_total_time=600"""
from _harness import main

if __name__ == "__main__":
    main("he_blob")
