/**
 * The plain chat template for models trained on raw text. Each message becomes one line, its role
 * as a label, and the prompt ends with the assistant's label for the model to continue:
 *
 *     System: You are terse.
 *     User: hello
 *     Assistant: hi
 *     User: how are you?
 *     Assistant:
 *
 * (`developer` messages are labelled `System`). Generation stops where the model starts the next
 * turn: at a new line beginning with `User:` or `System:` (CHAT_STOP), besides the request's own
 * `stop`.
 */

export type ChatRole = 'system' | 'developer' | 'user' | 'assistant';

export interface ChatMessage {
  role: ChatRole;
  content: string;
}

const LABEL: Record<ChatRole, string> = {
  system: 'System',
  developer: 'System',
  user: 'User',
  assistant: 'Assistant',
};

/** Where a chat completion stops by itself: the start of another turn. */
export const CHAT_STOP = ['\nUser:', '\nSystem:'];

/** The prompt text of a conversation under the plain template. */
export function renderChat(messages: ChatMessage[]): string {
  return messages.map((m) => `${LABEL[m.role]}: ${m.content}\n`).join('') + 'Assistant:';
}
