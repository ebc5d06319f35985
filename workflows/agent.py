"""Agent: a model plans tool calls, the steps run them, the model answers.

The shape of a real tool-using agent, made deterministic: ``ScriptedModel``
stands in for an LLM (no network, same answer every time), and the tools are a
small in-memory knowledge base search and a safe calculator. Each phase of the
loop is a durable step, so a crash after the searches does not search again::

    stepvault run workflows/agent.py --input '"How many people live in Lyon and Paris in total?"'
    python workflows/agent.py "What is the population density of Paris?"
"""

from __future__ import annotations

import ast
import asyncio
import operator
import re
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from engine import FileStore, Runner, StepContext, Workflow

wf = Workflow("agent", version="1")

DEFAULT_QUESTION = "What is the combined population of Lyon and Marseille?"


class Document(BaseModel):
    """One entry of the knowledge base."""

    id: str
    title: str
    text: str
    facts: dict[str, int | float]


# Approximate figures (2021 census; area in km²), enough to answer questions.
KNOWLEDGE_BASE = [
    Document(
        id="paris",
        title="Paris",
        text="Paris, the capital of France, had a population of 2,133,111 on 105.4 km².",
        facts={"population": 2_133_111, "area": 105.4},
    ),
    Document(
        id="marseille",
        title="Marseille",
        text="Marseille, a port on the Mediterranean, had a population of 873,076 on 240.6 km².",
        facts={"population": 873_076, "area": 240.6},
    ),
    Document(
        id="lyon",
        title="Lyon",
        text="Lyon, at the meeting of the Rhône and the Saône, had a population of 522,250 "
        "on 47.9 km².",
        facts={"population": 522_250, "area": 47.9},
    ),
    Document(
        id="toulouse",
        title="Toulouse",
        text="Toulouse, on the Garonne, had a population of 504,078 on 118.3 km².",
        facts={"population": 504_078, "area": 118.3},
    ),
]


class ToolCall(BaseModel):
    """One tool call the model asked for, and what the tool returned."""

    tool: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None


class Plan(BaseModel):
    """The model's reading of the question: what to look up and how to combine it."""

    question: str
    entities: list[str]
    attribute: str
    operation: str | None
    expression: str | None = None
    calls: list[ToolCall]


class Answer(BaseModel):
    """The agent's reply, with the tool calls that back it."""

    question: str
    answer: str
    sources: list[str]
    tool_calls: list[ToolCall]


# -- tools --------------------------------------------------------------------------


STOPWORDS = {"a", "and", "how", "in", "is", "of", "on", "the", "to", "what", "who"}


def search(query: str, limit: int = 2) -> list[dict[str, Any]]:
    """Return the documents sharing most words with ``query``, best first."""
    words = set(re.findall(r"\w+", query.lower())) - STOPWORDS
    scored = []
    for doc in KNOWLEDGE_BASE:
        score = len(words & set(re.findall(r"\w+", f"{doc.title} {doc.text}".lower())))
        if score:
            scored.append((score, doc))
    scored.sort(key=lambda pair: -pair[0])
    return [doc.model_dump() for _, doc in scored[:limit]]


_OPERATORS: dict[type[ast.AST], Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def calculate(expression: str) -> float:
    """Evaluate arithmetic (+ - * / and parentheses) without ``eval``."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported expression: {ast.unparse(node)}")

    return walk(ast.parse(expression, mode="eval").body)


TOOLS: dict[str, Callable[..., Any]] = {"search": search, "calculator": calculate}


def run_tool(call: ToolCall) -> ToolCall:
    """Execute one call; a tool's failure is recorded for the model, not raised."""
    try:
        return call.model_copy(update={"result": TOOLS[call.tool](**call.arguments)})
    except Exception as exc:  # the model sees the error, as with a real tool API
        return call.model_copy(update={"error": f"{type(exc).__name__}: {exc}"})


# -- the "model" --------------------------------------------------------------------


OPERATIONS = {"combined": "+", "total": "+", "together": "+", "difference": "-"}
"""Words that ask to combine looked-up values, and the operator each asks for."""

SPOKEN_OPERATORS = {
    "multiplied by": "*",
    "times": "*",
    "divided by": "/",
    "plus": "+",
    "minus": "-",
}
"""Arithmetic said in words, as in "What is 6 times 7?"."""


class ScriptedModel:
    """A deterministic stand-in for an LLM that plans tool calls and writes answers."""

    def plan(self, question: str) -> Plan:
        """Pick the entities and attribute asked about and the searches to run."""
        text = question.lower()
        mentioned = [doc.title for doc in KNOWLEDGE_BASE if doc.title.lower() in text]
        entities = sorted(mentioned, key=lambda title: text.index(title.lower()))
        expression = None if entities else self.expression(text)
        if expression is not None:  # plain arithmetic: nothing to look up
            return Plan(
                question=question,
                entities=[],
                attribute="value",
                operation=None,
                expression=expression,
                calls=[],
            )
        attribute = next((a for a in ("density", "area") if a in text), "population")
        operation = next((op for word, op in OPERATIONS.items() if word in text), None)
        queries = [f"{name} {attribute}" for name in entities] or [question]
        calls = [ToolCall(tool="search", arguments={"query": q, "limit": 1}) for q in queries]
        return Plan(
            question=question,
            entities=entities,
            attribute=attribute,
            operation=operation,
            calls=calls,
        )

    def expression(self, text: str) -> str | None:
        """Find arithmetic in the question, with spoken operators turned into symbols."""
        for words, symbol in SPOKEN_OPERATORS.items():
            text = text.replace(words, symbol)
        candidates = [
            part.strip()
            for part in re.findall(r"[\d.+\-*/()\s]+", text)
            if re.search(r"\d\s*[-+*/]\s*[\d(]", part)
        ]
        return max(candidates, key=len, default=None)

    def values(self, plan: Plan, calls: list[ToolCall]) -> dict[str, float]:
        """Read the attribute of each entity out of the search results."""
        found: dict[str, float] = {}
        for call in calls:
            if call.tool != "search" or call.error is not None:
                continue
            for doc in call.result or []:
                if doc["title"] in plan.entities:
                    facts = doc["facts"]
                    if plan.attribute == "density":
                        found[doc["title"]] = facts["population"] / facts["area"]
                    else:
                        found[doc["title"]] = facts[plan.attribute]
        return found

    def arithmetic(self, plan: Plan, values: dict[str, float]) -> ToolCall | None:
        """Ask the calculator to combine the values, when the question needs it."""
        if plan.expression is not None:
            return ToolCall(tool="calculator", arguments={"expression": plan.expression})
        if plan.operation is None or len(values) < 2:
            return None
        ordered = [values[name] for name in plan.entities if name in values]
        if plan.operation == "-":  # "the difference between A and B" is never negative
            ordered.sort(reverse=True)
        expression = f" {plan.operation} ".join(repr(value) for value in ordered)
        return ToolCall(tool="calculator", arguments={"expression": expression})

    def answer(self, plan: Plan, values: dict[str, float], calculation: ToolCall | None) -> str:
        """Phrase the reply from what the tools returned."""
        if calculation is not None and calculation.error is not None:
            expression = calculation.arguments["expression"]
            return f"The calculator could not work out {expression}: {calculation.error}"
        result = None if calculation is None else float(calculation.result)
        if plan.expression is not None and result is not None:
            return f"{plan.expression} = {_number(result)}"
        if not values:
            return f"I could not find anything about that in the knowledge base: {plan.question}"
        unit = {"area": " km²", "density": " inhabitants per km²"}.get(plan.attribute, "")
        what = "population density" if plan.attribute == "density" else plan.attribute
        names = " and ".join(values)
        if result is None:
            return " ".join(
                f"The {what} of {name} is {_number(value)}{unit}." for name, value in values.items()
            )
        parts = "; ".join(f"{name}: {_number(value)}{unit}" for name, value in values.items())
        if plan.operation == "+":
            return f"The combined {what} of {names} is {_number(result)}{unit} ({parts})."
        between = " and ".join(values)
        return f"The difference in {what} between {between} is {_number(result)}{unit} ({parts})."


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


MODEL = ScriptedModel()


# -- the workflow -------------------------------------------------------------------
# Tool calls are recorded in each step's output and in ctx.state["tool_calls"];
# per-call ToolResults in the session's tool history (ctx.tool(...)) come with the
# workflow-features issue.


def _record(ctx: StepContext, calls: list[ToolCall]) -> None:
    history = list(ctx.state.get("tool_calls", []))
    ctx.state["tool_calls"] = history + [call.model_dump() for call in calls]


@wf.step
async def plan(ctx: StepContext, question: str | None) -> Plan:
    """Let the model read the question and plan its searches."""
    planned = MODEL.plan(question or DEFAULT_QUESTION)
    ctx.state["question"] = planned.question
    return planned


@wf.step
async def search_knowledge(ctx: StepContext, planned: Plan) -> list[ToolCall]:
    """Run the planned searches against the knowledge base."""
    calls = [run_tool(call) for call in planned.calls]
    _record(ctx, calls)
    return calls


@wf.step
async def compute(ctx: StepContext, searches: list[ToolCall]) -> list[ToolCall]:
    """Let the model combine what it found, calling the calculator when it must."""
    planned = Plan.model_validate(ctx.outputs["plan"])
    request = MODEL.arithmetic(planned, MODEL.values(planned, searches))
    calls = [run_tool(request)] if request is not None else []
    _record(ctx, calls)
    return searches + calls


@wf.step
async def answer(ctx: StepContext, calls: list[ToolCall]) -> Answer:
    """Let the model write the reply from the tool results."""
    planned = Plan.model_validate(ctx.outputs["plan"])
    values = MODEL.values(planned, calls)
    calculations = [call for call in calls if call.tool == "calculator"]
    reply = MODEL.answer(planned, values, calculations[-1] if calculations else None)
    sources = sorted(
        {
            doc["id"]
            for c in calls
            if c.tool == "search"
            for doc in c.result or []
            if doc["title"] in values
        }
    )
    ctx.state["answered"] = True
    return Answer(question=planned.question, answer=reply, sources=sources, tool_calls=calls)


async def main(question: str) -> None:
    """Ask the agent one question on a FileStore in ./sessions and print the reply."""
    async with Runner(FileStore("./sessions"), workflows=[wf]) as runner:
        reply = await runner.run(wf, question)
    print(reply.answer)
    for call in reply.tool_calls:
        print(f"  {call.tool}({call.arguments}) -> {call.error or 'ok'}")


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or DEFAULT_QUESTION))
