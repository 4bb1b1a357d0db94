"""atheris target: requests (see fuzz/README.md). Run: python fuzz/fuzz_requests.py -max_total_time=600"""
from _harness import main

if __name__ == "__main__":
    main("requests")
