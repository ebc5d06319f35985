"""A LangGraph graph that keeps its threads in stepvault, with a human in the loop.

A writer drafts; a reviewer (you) approves or asks for a revision. The graph
stops at ``interrupt()`` to wait for the review, and the process may exit: the
thread is a stepvault session, so the next process, hours later, resumes it.
Needs the ``langgraph`` extra (``pip install 'stepvault[langgraph]'``)::

    python workflows/langgraph_graph.py start "durable workflows"   # a draft, then it waits
    python workflows/langgraph_graph.py answer revise               # another draft, waits
    python workflows/langgraph_graph.py answer approve              # done
    stepvault sessions ls --workflow langgraph                      # the thread, as a session

The store comes from ``STEPVAULT_STORE`` (default ``./sessions``); the thread id
from ``--thread`` (default ``essay``).
"""

from __future__ import annotations

import argparse
import json
import operator
import os
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from engine import open_store
from engine.integrations.langgraph import StepvaultSaver, session_id_for


class Essay(TypedDict):
    """The graph's state: drafts accumulate, one per revision."""

    topic: str
    drafts: Annotated[list[str], operator.add]
    verdict: str


def write(state: Essay) -> dict[str, Any]:
    """Write the next draft (a real graph would call a model here)."""
    number = len(state["drafts"]) + 1
    return {"drafts": [f"Draft {number}: why {state['topic']} matter, take {number}"]}


def review(state: Essay) -> dict[str, Any]:
    """Stop until a person answers; their answer is the verdict."""
    verdict = interrupt({"draft": state["drafts"][-1], "choices": ["approve", "revise"]})
    return {"verdict": verdict}


def after_review(state: Essay) -> str:
    """Revise until approved."""
    return END if state["verdict"] == "approve" else "write"


def build() -> StateGraph[Essay]:
    """Return the (uncompiled) graph: write -> review -> write ... until approved."""
    graph = StateGraph(Essay)
    graph.add_node("write", write)
    graph.add_node("review", review)
    graph.add_edge(START, "write")
    graph.add_edge("write", "review")
    graph.add_conditional_edges("review", after_review, ["write", END])
    return graph


def run(store_url: str, thread: str, command: str, value: str) -> dict[str, Any]:
    """Start the thread on a topic, or answer its pending review; return where it stands."""
    config: Any = {"configurable": {"thread_id": thread}}
    with StepvaultSaver(open_store(store_url)) as saver:
        graph = build().compile(checkpointer=saver)
        if command == "start":
            graph.invoke({"topic": value, "drafts": [], "verdict": ""}, config)
        else:
            graph.invoke(Command(resume=value), config)
        snapshot = graph.get_state(config)
    waiting = [i.value for task in snapshot.tasks for i in task.interrupts]
    return {
        "thread": thread,
        "session_id": session_id_for(thread),
        "drafts": snapshot.values["drafts"],
        "verdict": snapshot.values.get("verdict") or None,
        "waiting_for_review": waiting[0]["draft"] if waiting else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run one step of the conversation, print where it stands."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "answer"])
    parser.add_argument("value", help="the topic (start) or approve / revise (answer)")
    parser.add_argument("--thread", default="essay")
    args = parser.parse_args(argv)
    store = os.environ.get("STEPVAULT_STORE", "./sessions")
    print(json.dumps(run(store, args.thread, args.command, args.value), indent=2))


if __name__ == "__main__":
    main()
