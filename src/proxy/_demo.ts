/**
 * The demo behind `serve` without `--upstream`: the demo Glance
 * ({@linkcode demoOrigin}) behind Keystone-like tokens, so that the access
 * check shows: without a token, `401`; `demo-viewer` sees the metadata but
 * may not download (`403`, Glance's `download_image` policy); `demo-reader`
 * downloads; `demo-service` is the proxy's own (prefetches).
 *
 * @module
 */
import { type Context, Hono } from "hono";
import { demoOrigin } from "../testing/demo_origin.ts";

/** The demo's tokens and what each may do. */
export const DEMO_TOKENS = {
  reader: "demo-reader",
  viewer: "demo-viewer",
  service: "demo-service",
} as const;

/** The demo Glance: its app and its images (id and size). */
export function demoGlance(): { app: Hono; images: Record<string, { size: number }> } {
  const origin = demoOrigin();
  const app = new Hono();
  const guard = (download: boolean) => async (c: Context, next: () => Promise<void>) => {
    const token = c.req.header("x-auth-token");
    if (token === undefined || !(Object.values(DEMO_TOKENS) as string[]).includes(token)) {
      return c.text(
        `Authentication required: send X-Auth-Token: ${DEMO_TOKENS.reader} (this is the demo Glance)\n`,
        401,
        { "www-authenticate": "Keystone uri='http://keystone.invalid'" },
      );
    }
    if (download && c.req.method === "GET" && token === DEMO_TOKENS.viewer) {
      return c.text("Forbidden: download_image is not allowed for this token\n", 403);
    }
    await next();
  };
  app.use("/v2/images/:id", guard(false));
  app.use("/v2/images/:id/file", guard(true));
  app.use("/v1/images/:id", guard(true));
  app.get("/", (c) => c.json({ versions: [{ id: "v2.16", status: "CURRENT" }] }, 300));
  app.route("/", origin.app);
  return { app, images: origin.images };
}
