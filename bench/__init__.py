"""`python -m bench`: Pensieve against llama-server and in-process llama-cpp-python.

Measures decode throughput, time to first token with a long shared prefix (cold, warm, warm
with a second conversation interleaved), concurrent clients, memory and start-up time, each as
a median over several runs and as ratios against references measured in the same run. Writes
a JSON report and a Markdown table. A benchmark, not a test: nothing here asserts.
"""
