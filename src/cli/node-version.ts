/**
 * The notice s3blk prints on a Node.js older than 22. Node 20 reached its end of life in April
 * 2026, and releases of the AWS SDK for JavaScript from January 2027 on need Node 22 or later.
 * s3blk still runs on Node 20.19+, so this is a notice, once a run, on stderr, in our words; the
 * SDK's own warning (several lines, on every start) is turned off by the CLI in its favour.
 * `S3BLK_NODE_NOTICE=off` turns ours off too.
 */

/** The environment variable that turns the notice off when set to `off`. */
export const NODE_NOTICE_VARIABLE = "S3BLK_NODE_NOTICE";

/** Node majors below this get the notice. */
export const RECOMMENDED_NODE_MAJOR = 22;

/**
 * The notice for Node `version` (e.g. `process.versions.node`, "20.19.0"), or undefined when
 * there is none to give: Node 22 or later, or `S3BLK_NODE_NOTICE=off` in `env`.
 */
export function nodeVersionNotice(
  version: string,
  env: Readonly<Record<string, string | undefined>>,
): string | undefined {
  if (env[NODE_NOTICE_VARIABLE]?.trim().toLowerCase() === "off") return undefined;
  const major = Number.parseInt(version.replace(/^v/, ""), 10);
  if (!Number.isSafeInteger(major) || major >= RECOMMENDED_NODE_MAJOR) return undefined;
  return (
    `s3blk: note: Node.js ${version} is past its end of life, and AWS SDK releases from ` +
    `January 2027 on need Node ${RECOMMENDED_NODE_MAJOR} or later. s3blk still runs on it, but ` +
    `Node 24 (the current LTS) is recommended. ${NODE_NOTICE_VARIABLE}=off hides this note.`
  );
}

/** Print the notice for this process's Node to stderr, if there is one. */
export function printNodeVersionNotice(): void {
  const notice = nodeVersionNotice(process.versions.node, process.env);
  if (notice !== undefined) process.stderr.write(`${notice}\n`);
}
