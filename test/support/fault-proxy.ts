/** The fault proxy lives beside the benchmark, which runs it too (latency); tests import it here. */
export * from "../../src/bench/fault-proxy.js";
