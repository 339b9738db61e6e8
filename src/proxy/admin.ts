/**
 * {@linkcode adminTokenCheck}: the management API behind a bearer token.
 *
 * @module
 */
import type { AuthorizeCacheAction } from "../cache_api.ts";
import { tokensCheck } from "./_shared.ts";

/**
 * An admin check for the management API: the request must carry `token` as
 * `Authorization: Bearer <token>` or `X-Auth-Token: <token>`. Compared in
 * constant time.
 *
 * @param token The admin token (at least 16 characters).
 * @returns An `authorize` function for `cacheApi`: `401` without a token,
 *   `403` with a wrong one.
 * @throws {TypeError} When `token` is not a string of at least 16 characters.
 *
 * @example Guarding a route with the admin token
 * ```ts
 * import { Hono } from "hono";
 * import { adminTokenCheck } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const authorize = adminTokenCheck("s3cret-admin-token-0123");
 * const app = new Hono();
 * app.get("/admin", async (c) => {
 *   const verdict = await authorize(c, "cache_list");
 *   return verdict === true ? c.text("ok") : verdict as Response;
 * });
 * const ok = await app.request("/admin", {
 *   headers: { authorization: "Bearer s3cret-admin-token-0123" },
 * });
 * assert.equal(await ok.text(), "ok");
 * const no = await app.request("/admin");
 * assert.equal(no.status, 401);
 * await no.body?.cancel();
 * ```
 */
export function adminTokenCheck(token: string): AuthorizeCacheAction {
  if (typeof token !== "string" || token.length < 16) {
    throw new TypeError(
      `Cannot create adminTokenCheck: "token" must be a string of at least 16 characters, received ${
        typeof token === "string" ? `${token.length} characters` : typeof token
      }`,
    );
  }
  const check = tokensCheck([token], "the management API needs the admin token");
  return function adminTokenCheck(c) {
    return check(c);
  };
}
