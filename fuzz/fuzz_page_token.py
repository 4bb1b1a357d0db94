"""atheris target: page_token (see fuzz/README.md). Run: python fuzz/fuzz_page_token.py -max_total_time=600"""
from _harness import main

if __name__ == "__main__":
    main("page_token")
