/** The guest harness lives beside the benchmark, whose boot row runs it too; tests import it here. */
export * from "../../src/bench/guest.js";
