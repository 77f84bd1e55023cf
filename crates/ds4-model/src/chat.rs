//! The DeepSeek V4 chat encoding: messages in, a typed prompt out.
//!
//! This follows the official encoder (`encoding_dsv4.py: encode_messages`, summarised in
//! PROMPT.md §2.3): tool messages merged into user turns and sorted by call order,
//! historical reasoning dropped unless tools are in play, tool schemas rendered into the
//! system prompt, tool calls rendered as DSML, the three thinking modes with the
//! Think-Max prefix (only when the context is at least 384 Ki tokens).
//!
//! The prompt is deliberately not a string but a sequence of [`Segment`]s: control
//! tokens, template text, model-generated text and untrusted text (user, system and tool
//! results). [`Prompt::tokenize`] recognises special-token literals only outside the
//! untrusted segments, so a user message containing `<｜User｜>` or `</think>` stays
//! text (PROMPT.md §1.6, GAP-T1), while everything else tokenizes exactly as the
//! official pipeline (`tokenizer.encode(encode_messages(...))`) would.
//! [`Prompt::to_text`] is the rendered string; `decode(tokenize(p)) == to_text(p)` always.

use crate::dsml::{self, ToolCall};
use crate::tokenizer::{
    ASSISTANT_TEXT, BOS_TEXT, EOS_TEXT, THINK_END_TEXT, THINK_TEXT, Tokenizer, TokenizerError,
    USER_TEXT,
};

/// Literal of the internal "latest reminder" role token.
pub const LATEST_REMINDER_TEXT: &str = "<｜latest_reminder｜>";

/// Think-Max prefix (PROMPT.md §2.5), placed right after BOS.
pub const REASONING_EFFORT_MAX_PREFIX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// Think-Max needs at least this context (384 Ki tokens); below it `max` becomes `high`.
pub const THINK_MAX_MIN_CTX: usize = 393_216;

/// The official tools block; `{tool_schemas}` is replaced by one JSON object per line.
const TOOLS_TEMPLATE: &str = "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n{tool_schemas}\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

/// ds4's tools block (`ds4_server.c: append_tools_prompt_text`, PROMPT.md §2.7): reworded
/// string-parameter rules, raw schema lines, no trailing newline.
const DS4_TOOLS_TEMPLATE: &str = "## Tools\n\nYou have access to a set of tools to help answer the user question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nString parameters should be specified as raw text and set `string=\"true\"`. Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string characters with XML or HTML entity escapes. Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, write that tag as `&lt;/｜DSML｜parameter>` inside the value. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n{tool_schemas}\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. Use the exact parameter names from the schemas.";

const RESPONSE_FORMAT_PREFIX: &str =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// System prompt (raw text after BOS, or in place if not first).
    System,
    /// Developer message: rendered like a user turn (official encoder).
    Developer,
    /// User turn.
    User,
    /// Assistant turn (content, reasoning, tool calls).
    Assistant,
    /// Tool result; merged into the surrounding user turn.
    Tool,
    /// Internal "latest reminder" role.
    LatestReminder,
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Author.
    pub role: Role,
    /// Text content.
    pub content: String,
    /// Assistant reasoning (`reasoning_content`).
    pub reasoning: Option<String>,
    /// Assistant tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// For tool results: the id of the call they answer (orders results).
    pub tool_call_id: Option<String>,
    /// Exact DSML block (with its leading separator) that the model generated for these
    /// tool calls: rendered verbatim instead of the canonical form (exact replay, §2.10).
    pub raw_tool_block: Option<String>,
}

impl ChatMessage {
    /// A message with only a role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            reasoning: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            raw_tool_block: None,
        }
    }

    /// A tool result answering `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(tool_call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }
}

/// Thinking mode (PROMPT.md §2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThinkingMode {
    /// Non-thinking: the assistant turn opens with `</think>`.
    None,
    /// Thinking (the default).
    #[default]
    High,
    /// Think Max: thinking plus the effort prefix; needs a large context.
    Max,
}

/// Which renderer to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// DeepSeek's official encoder (what the model was trained on). The default.
    #[default]
    Official,
    /// ds4's server renderer (`ds4_server.c: render_chat_prompt_text`, PROMPT.md §2.4):
    /// tools block first and reworded, raw schemas, system text hoisted, one `<｜User｜>`
    /// per message, tool results concatenated. Only for sharing KV caches with ds4.
    Ds4,
}

/// Options of [`render`].
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// Thinking mode requested.
    pub thinking: ThinkingMode,
    /// Context size of the session, for the Think-Max rule.
    pub ctx_size: usize,
    /// Tool definitions as JSON text (each the OpenAI `function` object: name,
    /// description, parameters), attached to the first system message.
    pub tools: Vec<String>,
    /// Response-format JSON schema text, attached like the tools.
    pub response_format: Option<String>,
    /// Drop historical reasoning (official default; forced off when tools are present).
    pub drop_thinking: bool,
    /// Render a final assistant message without its EOS so generation continues it
    /// (assistant prefill; the official encoder's `wo_eos`).
    pub continue_final_assistant: bool,
    /// Official (default) or ds4-compatible rendering.
    pub layout: Layout,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            thinking: ThinkingMode::High,
            ctx_size: 0,
            tools: Vec::new(),
            response_format: None,
            drop_thinking: true,
            continue_final_assistant: false,
            layout: Layout::Official,
        }
    }
}

impl ChatOptions {
    /// The mode actually used: `Max` falls back to `High` below [`THINK_MAX_MIN_CTX`].
    pub fn effective_thinking(&self) -> ThinkingMode {
        match self.thinking {
            ThinkingMode::Max if self.ctx_size < THINK_MAX_MIN_CTX => ThinkingMode::High,
            m => m,
        }
    }
}

/// Where a piece of prompt text came from; decides whether special-token literals in it
/// may become control tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Our own template text (tools instructions with DSML examples): specials recognised.
    Template,
    /// Text the model generated (reasoning, content, DSML blocks): specials recognised.
    Model,
    /// User, system and tool-result text: plain text unless the caller opts in.
    Untrusted,
}

/// One piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A control token, by literal text.
    Special(&'static str),
    /// Text with its origin.
    Text {
        /// The text.
        text: String,
        /// Its origin.
        trust: Trust,
    },
}

/// A rendered prompt: typed segments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prompt {
    /// The segments in order.
    pub segments: Vec<Segment>,
}

impl Prompt {
    fn special(&mut self, lit: &'static str) {
        self.segments.push(Segment::Special(lit));
    }

    fn text(&mut self, text: impl Into<String>, trust: Trust) {
        let text = text.into();
        if !text.is_empty() {
            self.segments.push(Segment::Text { text, trust });
        }
    }

    /// The rendered prompt as one string (what the official encoder returns).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Special(lit) => out.push_str(lit),
                Segment::Text { text, .. } => out.push_str(text),
            }
        }
        out
    }

    /// Token ids. Special literals inside untrusted text stay text unless
    /// `special_in_untrusted` (the official-compatible, injectable behaviour).
    pub fn tokenize(
        &self,
        tok: &Tokenizer,
        special_in_untrusted: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        for s in &self.segments {
            if let Segment::Special(lit) = s
                && tok.token_id(lit).is_none_or(|id| !tok.is_added(id))
            {
                return Err(TokenizerError::MissingToken((*lit).to_string()));
            }
        }
        Ok(tok.encode_parts(self.segments.iter().map(|s| match s {
            Segment::Special(lit) => (*lit, true),
            Segment::Text { text, trust } => (
                text.as_str(),
                *trust != Trust::Untrusted || special_in_untrusted,
            ),
        })))
    }
}

// ===========================================================================
// Rendering.

/// A block of a merged user turn.
#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { id: String, content: String },
}

/// A message after merging (the official `content_blocks` form).
#[derive(Debug, Clone)]
struct Msg {
    role: Role,
    content: String,
    blocks: Option<Vec<Block>>,
    reasoning: Option<String>,
    tool_calls: Vec<ToolCall>,
    raw_tool_block: Option<String>,
    tools: Vec<String>,
    response_format: Option<String>,
}

fn last_user_index(msgs: &[Msg]) -> Option<usize> {
    msgs.iter()
        .rposition(|m| matches!(m.role, Role::User | Role::Developer))
}

/// Renders a conversation into a prompt (official layout, PROMPT.md §2.3). The prompt
/// starts with BOS and, when the last message is a user/tool turn, ends with the
/// generation prefix (`<｜Assistant｜><think>` or `<｜Assistant｜></think>`).
pub fn render(messages: &[ChatMessage], opts: &ChatOptions) -> Prompt {
    if opts.layout == Layout::Ds4 {
        return render_ds4(messages, opts);
    }
    let mode = opts.effective_thinking();
    let thinking = mode != ThinkingMode::None;

    // Step 0: attach the request's tools (and response format) to the first system
    // message, creating an empty one at the front if there is none.
    let mut msgs: Vec<Msg> = Vec::with_capacity(messages.len() + 1);
    let needs_system = !opts.tools.is_empty() || opts.response_format.is_some();
    if needs_system && !messages.iter().any(|m| m.role == Role::System) {
        msgs.push(Msg {
            role: Role::System,
            content: String::new(),
            blocks: None,
            reasoning: None,
            tool_calls: Vec::new(),
            raw_tool_block: None,
            tools: Vec::new(),
            response_format: None,
        });
    }
    // Step 1: merge runs of user and tool messages into one user turn.
    for m in messages {
        let block = match m.role {
            Role::Tool => Some(Block::ToolResult {
                id: m.tool_call_id.clone().unwrap_or_default(),
                content: m.content.clone(),
            }),
            Role::User => Some(Block::Text(m.content.clone())),
            _ => None,
        };
        if let Some(block) = block {
            if let Some(last) = msgs.last_mut()
                && last.role == Role::User
                && let Some(blocks) = last.blocks.as_mut()
            {
                blocks.push(block);
                continue;
            }
            msgs.push(Msg {
                role: Role::User,
                content: String::new(),
                blocks: Some(vec![block]),
                reasoning: None,
                tool_calls: Vec::new(),
                raw_tool_block: None,
                tools: Vec::new(),
                response_format: None,
            });
            continue;
        }
        msgs.push(Msg {
            role: m.role,
            content: m.content.clone(),
            blocks: None,
            reasoning: m.reasoning.clone(),
            tool_calls: m.tool_calls.clone(),
            raw_tool_block: m.raw_tool_block.clone(),
            tools: Vec::new(),
            response_format: None,
        });
    }
    if needs_system && let Some(sys) = msgs.iter_mut().find(|m| m.role == Role::System) {
        sys.tools = opts.tools.clone();
        sys.response_format = opts.response_format.clone();
    }
    // Step 2: order tool results by the position of their call in the latest assistant
    // message with tool calls (unknown ids sort as 0; the sort is stable).
    let mut order: Vec<(String, usize)> = Vec::new();
    for m in msgs.iter_mut() {
        if m.role == Role::Assistant && !m.tool_calls.is_empty() {
            order = m
                .tool_calls
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.id.clone().filter(|id| !id.is_empty()).map(|id| (id, i)))
                .collect();
        } else if let (Role::User, Some(blocks)) = (m.role, m.blocks.as_mut()) {
            let rank = |b: &Block| match b {
                Block::ToolResult { id, .. } => {
                    order.iter().find(|o| &o.0 == id).map_or(0, |o| o.1)
                }
                Block::Text(_) => 0,
            };
            let n_results = blocks
                .iter()
                .filter(|b| matches!(b, Block::ToolResult { .. }))
                .count();
            if n_results > 1 && !order.is_empty() {
                let mut sorted: Vec<Block> = blocks
                    .iter()
                    .filter(|b| matches!(b, Block::ToolResult { .. }))
                    .cloned()
                    .collect();
                sorted.sort_by_key(|b| rank(b));
                let mut it = sorted.into_iter();
                for b in blocks.iter_mut() {
                    if matches!(b, Block::ToolResult { .. }) {
                        *b = it.next().expect("same number of tool results");
                    }
                }
            }
        }
    }
    // Step 3: reasoning retention. Tools force it on.
    let drop = opts.drop_thinking && msgs.iter().all(|m| m.tools.is_empty());
    if thinking
        && drop
        && let Some(last_user) = last_user_index(&msgs)
    {
        let mut kept = Vec::with_capacity(msgs.len());
        for (i, mut m) in msgs.into_iter().enumerate() {
            if i >= last_user
                || matches!(
                    m.role,
                    Role::User | Role::System | Role::Tool | Role::LatestReminder
                )
            {
                kept.push(m);
            } else if m.role == Role::Assistant {
                m.reasoning = None;
                kept.push(m);
            }
            // Developer messages before the last user message are dropped.
        }
        msgs = kept;
    }
    // Step 4: render.
    let last_user = last_user_index(&msgs);
    let mut p = Prompt::default();
    p.special(BOS_TEXT);
    for (i, m) in msgs.iter().enumerate() {
        if i == 0 && mode == ThinkingMode::Max {
            p.text(REASONING_EFFORT_MAX_PREFIX, Trust::Template);
        }
        match m.role {
            Role::System => {
                p.text(m.content.clone(), Trust::Untrusted);
                render_system_extras(&mut p, m);
            }
            Role::Developer => {
                p.special(USER_TEXT);
                p.text(m.content.clone(), Trust::Untrusted);
                render_system_extras(&mut p, m);
            }
            Role::User | Role::Tool => {
                p.special(USER_TEXT);
                for (k, b) in m.blocks.iter().flatten().enumerate() {
                    if k > 0 {
                        p.text("\n\n", Trust::Template);
                    }
                    match b {
                        Block::Text(t) => p.text(t.clone(), Trust::Untrusted),
                        Block::ToolResult { content, .. } => {
                            p.text("<tool_result>", Trust::Template);
                            p.text(content.clone(), Trust::Untrusted);
                            p.text("</tool_result>", Trust::Template);
                        }
                    }
                }
                if m.blocks.is_none() {
                    p.text(m.content.clone(), Trust::Untrusted);
                }
            }
            Role::LatestReminder => {
                p.special(LATEST_REMINDER_TEXT);
                p.text(m.content.clone(), Trust::Untrusted);
            }
            Role::Assistant => {
                if thinking && (!drop || last_user.is_none_or(|u| i > u)) {
                    p.text(m.reasoning.clone().unwrap_or_default(), Trust::Model);
                    p.special(THINK_END_TEXT);
                }
                p.text(m.content.clone(), Trust::Model);
                if let Some(raw) = &m.raw_tool_block {
                    p.text(raw.clone(), Trust::Model);
                } else if !m.tool_calls.is_empty() {
                    p.text(dsml::render_tool_calls(&m.tool_calls), Trust::Model);
                }
                if !(opts.continue_final_assistant && i + 1 == msgs.len()) {
                    p.special(EOS_TEXT);
                }
            }
        }
        // Transition: after a user/developer turn that is last or followed by the
        // assistant, open the assistant turn.
        let next = msgs.get(i + 1).map(|n| n.role);
        if next.is_some_and(|r| !matches!(r, Role::Assistant | Role::LatestReminder)) {
            continue;
        }
        if matches!(m.role, Role::User | Role::Developer) {
            p.special(ASSISTANT_TEXT);
            let open = thinking && (!drop || last_user.is_none_or(|u| i >= u));
            p.special(if open { THINK_TEXT } else { THINK_END_TEXT });
        }
    }
    p
}

fn render_system_extras(p: &mut Prompt, m: &Msg) {
    if !m.tools.is_empty() {
        let (head, tail) = TOOLS_TEMPLATE
            .split_once("{tool_schemas}")
            .expect("template has the placeholder");
        p.text("\n\n", Trust::Template);
        p.text(head, Trust::Template);
        for (k, t) in m.tools.iter().enumerate() {
            if k > 0 {
                p.text("\n", Trust::Template);
            }
            // Re-serialised like Python's json.dumps; raw text if it does not parse.
            let schema = dsml::json::parse(t).map_or_else(|_| t.clone(), |v| v.to_python());
            p.text(schema, Trust::Untrusted);
        }
        p.text(tail, Trust::Template);
    }
    if let Some(rf) = &m.response_format {
        p.text("\n\n", Trust::Template);
        p.text(RESPONSE_FORMAT_PREFIX, Trust::Template);
        let schema = dsml::json::parse(rf).map_or_else(|_| rf.clone(), |v| v.to_python());
        p.text(schema, Trust::Untrusted);
    }
}

// ===========================================================================
// ds4-compatible rendering (PROMPT.md §2.4).

fn render_ds4(messages: &[ChatMessage], opts: &ChatOptions) -> Prompt {
    let mode = opts.effective_thinking();
    let thinking = mode != ThinkingMode::None;
    let tools_active = !opts.tools.is_empty();
    let tool_context = tools_active
        || messages.iter().any(|m| {
            m.role == Role::Tool || (m.role == Role::Assistant && !m.tool_calls.is_empty())
        });
    let last_user_or_tool = messages
        .iter()
        .rposition(|m| matches!(m.role, Role::User | Role::Tool));

    let mut p = Prompt::default();
    p.special(BOS_TEXT);
    if mode == ThinkingMode::Max {
        p.text(REASONING_EFFORT_MAX_PREFIX, Trust::Template);
    }
    // System region: tools first, then every system/developer text wherever it appears.
    let mut region_empty = true;
    if tools_active {
        let (head, tail) = DS4_TOOLS_TEMPLATE
            .split_once("{tool_schemas}")
            .expect("template has the placeholder");
        p.text(head, Trust::Template);
        for (k, t) in opts.tools.iter().enumerate() {
            if k > 0 {
                p.text("\n", Trust::Template);
            }
            p.text(t.clone(), Trust::Untrusted);
        }
        p.text(tail, Trust::Template);
        region_empty = false;
    }
    for m in messages {
        if matches!(m.role, Role::System | Role::Developer) {
            if !region_empty {
                p.text("\n\n", Trust::Template);
            }
            p.text(m.content.clone(), Trust::Untrusted);
            region_empty = false;
        }
    }
    // Turns.
    #[derive(PartialEq)]
    enum Prev {
        None,
        User,
        ToolResult,
        Assistant,
    }
    let mut prev = Prev::None;
    let mut pending_user = false; // a user/tool item since the last assistant
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => continue,
            Role::User | Role::LatestReminder => {
                p.special(USER_TEXT);
                p.text(m.content.clone(), Trust::Untrusted);
                prev = Prev::User;
                pending_user = true;
            }
            Role::Tool => {
                if prev != Prev::ToolResult {
                    p.special(USER_TEXT);
                }
                p.text("<tool_result>", Trust::Template);
                // ds4 neutralises the wrapper's own closing tag inside the result.
                p.text(
                    m.content.replace("</tool_result>", "&lt;/tool_result>"),
                    Trust::Untrusted,
                );
                p.text("</tool_result>", Trust::Template);
                prev = Prev::ToolResult;
                pending_user = true;
            }
            Role::Assistant => {
                if pending_user {
                    p.special(ASSISTANT_TEXT);
                    let keep =
                        thinking && (tool_context || last_user_or_tool.is_none_or(|u| i > u));
                    if keep {
                        p.special(THINK_TEXT);
                        p.text(m.reasoning.clone().unwrap_or_default(), Trust::Model);
                    }
                    p.special(THINK_END_TEXT);
                }
                p.text(m.content.clone(), Trust::Model);
                if let Some(raw) = &m.raw_tool_block {
                    p.text(raw.clone(), Trust::Model);
                } else if !m.tool_calls.is_empty() {
                    p.text(dsml::render_tool_calls_ds4(&m.tool_calls), Trust::Model);
                }
                if !(opts.continue_final_assistant && i + 1 == messages.len()) {
                    p.special(EOS_TEXT);
                }
                prev = Prev::Assistant;
                pending_user = false;
            }
        }
    }
    if matches!(prev, Prev::User | Prev::ToolResult) {
        p.special(ASSISTANT_TEXT);
        p.special(if thinking { THINK_TEXT } else { THINK_END_TEXT });
    }
    p
}
