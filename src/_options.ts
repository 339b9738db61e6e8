/** Validation of constructor and factory options, in one place. @module */

/**
 * A non-negative byte count or duration, or `fallback` when `value` is undefined.
 *
 * @throws {RangeError} When `value` is not a non-negative finite number.
 */
export function checkSize(
  owner: string,
  name: string,
  value: number | undefined,
  fallback: number,
): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new RangeError(
      `Cannot create ${owner}: "${name}" must be a non-negative number, received ${
        typeof value === "string" ? JSON.stringify(value) : value
      }`,
    );
  }
  return value;
}

/**
 * A function option, or `fallback` when undefined.
 *
 * @throws {TypeError} When `value` is neither undefined nor a function.
 */
export function checkFunction<T>(
  owner: string,
  name: string,
  value: T | undefined,
  fallback: T,
): T {
  if (value === undefined) return fallback;
  if (typeof value !== "function") {
    throw new TypeError(
      `Cannot create ${owner}: "${name}" must be a function, received ${typeof value}`,
    );
  }
  return value;
}
