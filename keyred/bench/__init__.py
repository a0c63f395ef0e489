"""Speed and memory of fla models and mixers at reduced key dims (the command line is keyred.stages.bench).

What the benchmarks show: shrinking the key dim d_k of a delta-rule layer at a fixed value dim d_v
shrinks its recurrent state [d_k, d_v] in proportion, and with it the memory traffic of decoding
and part of the chunked kernels' work; these modules measure how much of that becomes speed.

    plan      the options of a command (flags or --spec) -> BenchRequest; no fla (torch via the launch names)
    spec      the workflow's --spec of each job, from the config's bench section; light
    shapes    random-weight shapes (family, width, heads, d_k, d_v) and their fla config keys; light
    errors    the refusals (BenchmarkError, InsufficientMemoryError); light
    sources   checkpoints and random weights to benchmark, grouped by shape; the family's mixer layer
    memory    estimates before any work, free memory, the measured peak, out-of-memory as an error
    kernels   which delta-rule ops ran (a spy on keyred.fla.sites) and whose launch choices
    timing    warm-up, timed repeats, median and quartiles, shapes interleaved round-robin; CUDA graphs
    passes    the timed calls: model forward, mixer forward(+backward), cached decoding
    runs      the three kinds as one plan runner (a plan is a list of cases, one loop measures them)
    table     the tidy table's columns and the environment columns
"""
