/** The progress lines a long desktop operation reports as it goes (the CLI prints them). */
export type Log = (message: string) => void;

/** The log of a caller that wants none. */
export const quiet: Log = () => {};
